//! Access permissions (what a mapping allows) and access kinds (what a guest
//! or host access does).

use std::fmt;

/// A set of read / write / execute permissions.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perms {
    /// Reads are allowed.
    pub read: bool,
    /// Writes are allowed.
    pub write: bool,
    /// Instruction fetches are allowed.
    pub execute: bool,
}

impl Perms {
    /// No access.
    pub const NONE: Perms = Perms::new(false, false, false);
    /// Read only.
    pub const READ: Perms = Perms::new(true, false, false);
    /// Read and write.
    pub const READ_WRITE: Perms = Perms::new(true, true, false);
    /// Read and execute.
    pub const READ_EXECUTE: Perms = Perms::new(true, false, true);
    /// Everything.
    pub const ALL: Perms = Perms::new(true, true, true);

    /// Builds a permission set.
    pub const fn new(read: bool, write: bool, execute: bool) -> Perms {
        Perms {
            read,
            write,
            execute,
        }
    }

    /// True if every permission in `other` is also in `self`.
    pub const fn is_superset_of(&self, other: Perms) -> bool {
        (self.read || !other.read)
            && (self.write || !other.write)
            && (self.execute || !other.execute)
    }

    /// The permissions in both sets.
    pub const fn intersect(&self, other: Perms) -> Perms {
        Perms::new(
            self.read && other.read,
            self.write && other.write,
            self.execute && other.execute,
        )
    }

    /// True if `access` is allowed.
    pub const fn allows(&self, access: Access) -> bool {
        match access {
            Access::Read => self.read,
            Access::Write => self.write,
            Access::Execute => self.execute,
        }
    }

    /// True if no access at all is allowed.
    pub const fn is_none(&self) -> bool {
        !self.read && !self.write && !self.execute
    }
}

impl fmt::Debug for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{}{}",
            if self.read { 'r' } else { '-' },
            if self.write { 'w' } else { '-' },
            if self.execute { 'x' } else { '-' }
        )
    }
}

impl fmt::Display for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The kind of a single memory access.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Access {
    /// A load.
    Read,
    /// A store.
    Write,
    /// An instruction fetch.
    Execute,
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::Execute => "execute",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superset_and_allows() {
        assert!(Perms::ALL.is_superset_of(Perms::READ_WRITE));
        assert!(!Perms::READ.is_superset_of(Perms::READ_WRITE));
        assert!(Perms::READ.is_superset_of(Perms::NONE));
        assert!(Perms::READ_WRITE.allows(Access::Write));
        assert!(!Perms::READ_WRITE.allows(Access::Execute));
        assert_eq!(format!("{}", Perms::READ_EXECUTE), "r-x");
        assert_eq!(Perms::ALL.intersect(Perms::READ), Perms::READ);
    }
}
