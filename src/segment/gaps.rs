//! The gap index of a [`SegmentSet`](super::SegmentSet): a treap of gaps keyed
//! by start address, each node augmented with the largest gap length in its
//! subtree, so "the lowest gap at or above `x` with at least `len` bytes" is a
//! single `O(log n)` expected descent.
//!
//! Nodes live in a vector arena addressed by `u32` indices (no `Box` per
//! node, no unsafe); freed slots are reused.

const NIL: u32 = u32::MAX;

#[derive(Clone, Debug)]
struct Node {
    start: u64,
    len: u64,
    /// Largest `len` in this node's subtree.
    max_len: u64,
    /// Heap priority: a parent's is never below its children's.
    priority: u32,
    left: u32,
    right: u32,
}

/// Gaps by start address with subtree-maximum lengths.
#[derive(Clone)]
pub(super) struct GapIndex {
    nodes: Vec<Node>,
    free: Vec<u32>,
    root: u32,
    /// xorshift state for priorities; deterministic so runs are repeatable.
    rng: u64,
}

impl Default for GapIndex {
    fn default() -> Self {
        GapIndex {
            nodes: Vec::new(),
            free: Vec::new(),
            root: NIL,
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }
}

impl GapIndex {
    /// Heap bytes of the node arena (live and free nodes).
    pub(super) fn heap_bytes(&self) -> usize {
        self.nodes.capacity() * std::mem::size_of::<Node>()
            + self.free.capacity() * std::mem::size_of::<u32>()
    }

    /// Adds the gap `[start, start + len)`.
    ///
    /// Preconditions: `len > 0`; no gap starts at `start`.
    pub(super) fn insert(&mut self, start: u64, len: u64) {
        debug_assert!(len > 0);
        let priority = self.next_priority();
        let node = Node {
            start,
            len,
            max_len: len,
            priority,
            left: NIL,
            right: NIL,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.nodes[id as usize] = node;
                id
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        let (lo, hi) = self.split(self.root, start);
        let lo = self.merge(lo, id);
        self.root = self.merge(lo, hi);
    }

    /// Removes the gap starting at `start`.
    ///
    /// Preconditions: a gap starts at `start`.
    pub(super) fn remove(&mut self, start: u64) {
        let (lo, rest) = self.split(self.root, start);
        let (mid, hi) = self.split(rest, start + 1);
        debug_assert!(
            mid != NIL && self.node(mid).start == start && self.node(mid).left == NIL,
            "no gap at {start:#x}"
        );
        if mid != NIL {
            self.free.push(mid);
        }
        self.root = self.merge(lo, hi);
    }

    /// Moves the gap starting at `old_start` to `[new_start, new_start +
    /// len)` in place: one descent, then the subtree maxima on the way back.
    /// Key order is kept because no other gap starts between `old_start`
    /// and `new_start`, and priorities do not change, so the tree keeps its
    /// shape (cheaper than a remove and an insert: no split, no merge).
    ///
    /// Preconditions: `len > 0`; a gap starts at `old_start`; no other gap
    /// starts in the closed range between `old_start` and `new_start`.
    pub(super) fn adjust(&mut self, old_start: u64, new_start: u64, len: u64) {
        debug_assert!(len > 0);
        let mut path: [u32; 128] = [NIL; 128];
        let mut depth = 0;
        let mut cur = self.root;
        while cur != NIL {
            let n = self.node(cur);
            if depth == path.len() {
                // Deeper than any treap of realistic size: fall back.
                self.remove(old_start);
                self.insert(new_start, len);
                return;
            }
            path[depth] = cur;
            depth += 1;
            match old_start.cmp(&n.start) {
                std::cmp::Ordering::Less => cur = n.left,
                std::cmp::Ordering::Greater => cur = n.right,
                std::cmp::Ordering::Equal => break,
            }
        }
        debug_assert!(cur != NIL, "no gap at {old_start:#x}");
        if cur == NIL {
            return;
        }
        let node = &mut self.nodes[cur as usize];
        node.start = new_start;
        node.len = len;
        for &id in path[..depth].iter().rev() {
            self.update(id);
        }
    }

    /// The lowest gap starting at or above `from` with at least `len` bytes,
    /// as `(start, len)`.
    pub(super) fn first_at_least(&self, from: u64, len: u64) -> Option<(u64, u64)> {
        self.first_in(self.root, from, len)
            .map(|id| (self.node(id).start, self.node(id).len))
    }

    /// Every gap as `(start, len)` in address order (for invariant checks).
    pub(super) fn to_vec(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut stack = Vec::new();
        let mut cur = self.root;
        while cur != NIL || !stack.is_empty() {
            while cur != NIL {
                stack.push(cur);
                cur = self.node(cur).left;
            }
            let id = stack.pop().expect("non-empty stack");
            out.push((self.node(id).start, self.node(id).len));
            cur = self.node(id).right;
        }
        out
    }

    /// Checks heap order, key order and the subtree maxima.
    pub(super) fn check_invariants(&self) -> Result<(), String> {
        self.check_subtree(self.root, None, None).map(|_| ())
    }

    fn check_subtree(&self, id: u32, lo: Option<u64>, hi: Option<u64>) -> Result<u64, String> {
        if id == NIL {
            return Ok(0);
        }
        let n = self.node(id);
        if lo.is_some_and(|lo| n.start <= lo) || hi.is_some_and(|hi| n.start >= hi) {
            return Err(format!("gap node {:#x} out of key order", n.start));
        }
        for child in [n.left, n.right] {
            if child != NIL && self.node(child).priority > n.priority {
                return Err(format!("gap node {:#x} breaks heap order", n.start));
            }
        }
        let l = self.check_subtree(n.left, lo, Some(n.start))?;
        let r = self.check_subtree(n.right, Some(n.start), hi)?;
        let want = n.len.max(l).max(r);
        if n.max_len != want {
            return Err(format!(
                "gap node {:#x}: max_len {:#x}, want {want:#x}",
                n.start, n.max_len
            ));
        }
        Ok(want)
    }

    fn first_in(&self, id: u32, from: u64, len: u64) -> Option<u32> {
        if id == NIL || self.node(id).max_len < len {
            return None;
        }
        let n = self.node(id);
        if n.start < from {
            return self.first_in(n.right, from, len);
        }
        self.first_in(n.left, from, len)
            .or_else(|| (n.len >= len).then_some(id))
            .or_else(|| self.first_in(n.right, from, len))
    }

    fn node(&self, id: u32) -> &Node {
        &self.nodes[id as usize]
    }

    fn next_priority(&mut self) -> u32 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 32) as u32
    }

    fn update(&mut self, id: u32) {
        let n = self.node(id);
        let mut m = n.len;
        for child in [n.left, n.right] {
            if child != NIL {
                m = m.max(self.node(child).max_len);
            }
        }
        self.nodes[id as usize].max_len = m;
    }

    /// Splits a subtree into keys `< key` and keys `>= key`.
    fn split(&mut self, id: u32, key: u64) -> (u32, u32) {
        if id == NIL {
            return (NIL, NIL);
        }
        if self.node(id).start < key {
            let (lo, hi) = self.split(self.node(id).right, key);
            self.nodes[id as usize].right = lo;
            self.update(id);
            (id, hi)
        } else {
            let (lo, hi) = self.split(self.node(id).left, key);
            self.nodes[id as usize].left = hi;
            self.update(id);
            (lo, id)
        }
    }

    /// Joins two subtrees where every key of `a` is below every key of `b`.
    fn merge(&mut self, a: u32, b: u32) -> u32 {
        if a == NIL {
            return b;
        }
        if b == NIL {
            return a;
        }
        if self.node(a).priority >= self.node(b).priority {
            let r = self.merge(self.node(a).right, b);
            self.nodes[a as usize].right = r;
            self.update(a);
            a
        } else {
            let l = self.merge(a, self.node(b).left);
            self.nodes[b as usize].left = l;
            self.update(b);
            b
        }
    }
}
