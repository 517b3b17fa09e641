//! Bundled policy profiles: the IKS public defaults, dated, as moat
//! renders them (see the comments at the top of each file).

use std::path::Path;

use crate::policy::{load_str, Loaded, PolicySet};

/// A bundled profile.
pub struct Profile {
    pub name: &'static str,
    /// Which clusters it describes.
    pub applies_to: &'static str,
    pub yaml: &'static str,
}

/// Every bundled profile; the first is the current one.
pub const PROFILES: [Profile; 2] = [
    Profile {
        name: "iks-2019",
        applies_to:
            "IKS classic clusters created from 2019 on (allow-bigfix-port, no kubelet port)",
        yaml: include_str!("../../profiles/iks-2019.yaml"),
    },
    Profile {
        name: "iks-2017",
        applies_to: "IKS classic clusters created in 2017-2018 (allow-kubelet-port)",
        yaml: include_str!("../../profiles/iks-2017.yaml"),
    },
];

/// The profile named `name`.
pub fn find(name: &str) -> Option<&'static Profile> {
    PROFILES.iter().find(|p| p.name == name)
}

impl Profile {
    /// Its resources, parsed and validated like any policy file.
    pub fn load(&self) -> Loaded {
        load_str(
            Path::new(&format!("<bundled profile {}>", self.name)),
            self.yaml,
        )
    }
}

/// Adds the profile's resources to `set` (which holds no policy of its
/// own); a network set or failsafe profile of the user's with the same name
/// wins over the bundled one (so the operator fills in `iks-sys-mgmt`).
pub fn add_to(set: &mut PolicySet, profile: &Profile) {
    let p = profile.load().set;
    set.policies.extend(p.policies);
    for n in p.network_sets {
        if !set
            .network_sets
            .iter()
            .any(|m| m.resource() == n.resource())
        {
            set.network_sets.push(n);
        }
    }
    for f in p.failsafe_profiles {
        if !set.failsafe_profiles.iter().any(|g| g.name == f.name) {
            set.failsafe_profiles.push(f);
        }
    }
    set.sort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_profiles_are_valid_and_dated() {
        for p in &PROFILES {
            let l = p.load();
            assert!(l.errors.is_empty(), "{}: {:#?}", p.name, l.errors);
            let names: Vec<&str> = l.set.policies.iter().map(|x| x.name.as_str()).collect();
            for common in [
                "allow-all-outbound",
                "allow-icmp",
                "allow-node-port-dnat",
                "allow-sys-mgmt",
                "allow-vrrp",
            ] {
                assert!(names.contains(&common), "{}: {names:?}", p.name);
            }
        }
        let now = find("iks-2019").expect("current").load().set;
        assert!(now.policies.iter().any(|p| p.name == "allow-bigfix-port"));
        assert!(!now.policies.iter().any(|p| p.name == "allow-kubelet-port"));
        let old = find("iks-2017").expect("old").load().set;
        assert!(old.policies.iter().any(|p| p.name == "allow-kubelet-port"));
        assert!(!old.policies.iter().any(|p| p.name == "allow-bigfix-port"));
    }
}
