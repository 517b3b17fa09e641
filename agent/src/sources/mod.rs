//! Where policy comes from: a watched directory, Calico's etcd datastore or
//! the Kubernetes API, each turned into complete snapshots of resources that
//! `reconcile` validates and hands on (keeping an invalid object's last good
//! version) and compiles. Sources produce policy; they never touch the kernel's maps, so
//! this layer uses `policy` and `compile` only.

pub mod calicoctl;
pub mod directory;
pub mod etcd;
pub mod kube;
pub mod reconcile;
pub mod watched;
