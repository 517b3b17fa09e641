//! In-kernel tests of moat; see tests/tests.
