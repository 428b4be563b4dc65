#!/usr/bin/env python3
"""No import cycle between sibling modules inside a crate (issue 13).

For each crate given (default: protocol node store sim), walks the module
tree from `src/lib.rs`, `src/main.rs` and `src/bin/*.rs` (`mod x;` in files,
`x.rs` or `x/mod.rs`, and inline `mod x { ... }` blocks), and reads every path
a module names: `use` trees and paths in code that start with `crate::`,
`super::` or `self::`. A path to an item that its module only imported (a
private or `pub use` of another module's item) is followed to where the item
is defined, up to a few hops.

Granularity is the module (a file, or a directory module with everything
below it). A path from module F to module T adds an edge between the two
children of their deepest common ancestor on F's and T's side: `a::x` naming
`b::y` is an edge a -> b among the children of the crate root. A module
naming its own ancestors or its own descendants adds no edge (`super::*` in a
test module, a parent re-exporting a child). Every strongly connected set of
two or more siblings is a cycle; each is printed with the lines that make its
edges, and the exit status is 1.

Test modules (`#[cfg(test)]`, `#[cfg(all(test, ...))]`: `mod x;` or `mod x { ... }`) are left out: a test
may use a sibling's helpers (the test kit) without that being part of the
architecture. `--with-tests` counts them too.

What it cannot see: methods. Several modules may each add methods to a type
defined elsewhere (`impl World` in `sim/src/check.rs`); calling such a method
names no module, so it is no edge here.

Known cycles not yet broken are listed in `.ci/import_cycles.allow` (one a
line: `crate parent: member member ...`, parent `.` for the crate root): a
cycle whose members are all inside one listed set passes, with a note; a new
cycle, or a listed one that grew, fails. Shrink the list as cycles go.

Cheap and deterministic: plain text scanning, no compiler, files in sorted
order; runs in well under a second.
"""

import os
import re
import sys
from collections import defaultdict

CRATES_DEFAULT = ["protocol", "node", "store", "sim"]
# Hops followed through imports to find where an item is defined (a `use` of a
# `pub use` of a `pub use` ...); real chains here are one or two long.
REEXPORT_HOPS_MAX = 8
TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|::|[{}();,*$]|\S")


def strip(src):
    """The source with comments, string, byte-string and char literals blanked
    (newlines kept, so line numbers stay right)."""
    out = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            i = j
            continue
        if src.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif src.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append("\n" * src.count("\n", i, j))
            i = j
            continue
        m = re.match(r'(?:b|c)?r(#*)"', src[i:i + 300]) if c in "bcr" else None
        if m and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_")):
            end = '"' + m.group(1)
            j = src.find(end, i + m.end())
            j = n if j < 0 else j + len(end)
            out.append('""' + "\n" * src.count("\n", i, j))
            i = j
            continue
        if c == '"' or (c in "bc" and src.startswith('"', i + 1)
                        and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_"))):
            j = i + (1 if c == '"' else 2)
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            j += 1
            out.append('""' + "\n" * src.count("\n", i, j))
            i = j
            continue
        if c == "'":
            if src.startswith("\\", i + 1):
                j = src.find("'", i + 3)
                j = n if j < 0 else j + 1
                out.append("' '")
                i = j
                continue
            if i + 2 < n and src[i + 2] == "'":
                out.append("' '")
                i += 3
                continue
            out.append("'")  # a lifetime
            i += 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


def tokens(text):
    """(token, line) pairs."""
    line = 1
    pos = 0
    for m in TOKEN.finditer(text):
        line += text.count("\n", pos, m.start())
        pos = m.start()
        yield m.group(0), line


def use_paths(toks):
    """Expands a `use` tree (the tokens between `use` and `;`) into paths:
    (segments, bound name or None for a glob)."""
    out = []

    def tree(i, prefix):
        # Parses one use tree at toks[i]; returns the index after it.
        segs = list(prefix)
        while i < len(toks):
            t = toks[i]
            if t == "{":
                i += 1
                while i < len(toks) and toks[i] != "}":
                    i = tree(i, segs)
                    if i < len(toks) and toks[i] == ",":
                        i += 1
                return i + 1
            if t == "*":
                out.append((segs, None))
                return i + 1
            if t in (",", "}"):
                return i
            if t == "::":
                i += 1
                continue
            if t == "as":
                alias = toks[i + 1] if i + 1 < len(toks) else "_"
                out.append((segs, alias))
                return i + 2
            segs = segs + [t]
            i += 1
            if i >= len(toks) or toks[i] != "::":
                name = segs[-2] if segs[-1] == "self" and len(segs) > 1 else segs[-1]
                if segs[-1] == "self":
                    segs = segs[:-1]
                out.append((segs, name))
                if i < len(toks) and toks[i] == "as":
                    out[-1] = (segs, toks[i + 1] if i + 1 < len(toks) else "_")
                    i += 2
                return i
        return i

    i = 0
    while i < len(toks):
        i = tree(i, [])
        if i < len(toks) and toks[i] == ",":
            i += 1
        elif i < len(toks):
            i += 1
    return out


def cfg_test_before(toks, i):
    """Whether the `mod` at toks[i] carries `#[cfg(test)]` or a `cfg(all(test,
    ...))` (visibility and other attributes may stand between)."""
    j = i - 1
    while j >= 0 and toks[j][0] in ("pub", "crate", "super", "in", "(", ")", "self"):
        j -= 1
    while j >= 0 and toks[j][0] == "]":
        k = j
        while k >= 0 and toks[k][0] != "#":
            k -= 1
        attr = [t for t, _ in toks[k:j + 1]]
        if attr[:4] == ["#", "[", "cfg", "("] and "test" in attr and "not" not in attr:
            return True
        j = k - 1
    return False


class Crate:
    def __init__(self, name, root_file, with_tests=False):
        self.with_tests = with_tests
        self.name = name
        self.modules = {}  # module path (tuple) -> file
        self.refs = []  # (from module, absolute path tuple, file, line)
        self.imports = defaultdict(dict)  # module -> name -> absolute path
        self.walk(root_file, ())

    def child_file(self, parent_file, owns_dir, name, inline):
        base = os.path.dirname(parent_file)
        if not owns_dir:
            base = os.path.join(base, os.path.splitext(os.path.basename(parent_file))[0])
        for part in inline:
            base = os.path.join(base, part)
        for cand in (os.path.join(base, name + ".rs"), os.path.join(base, name, "mod.rs")):
            if os.path.isfile(cand):
                return cand
        return None

    def walk(self, path, modpath):
        self.modules[modpath] = path
        with open(path, encoding="utf-8") as f:
            text = strip(f.read())
        toks = list(tokens(text))
        owns_dir = os.path.basename(path) in ("lib.rs", "main.rs", "mod.rs") or (
            os.path.basename(os.path.dirname(path)) == "bin" and modpath == ())
        # Stack of (module path, brace depth at which its inline block closes,
        # whether it is a test module whose paths are not counted).
        stack = [(modpath, None, False)]
        depth = 0
        children = []
        i = 0
        while i < len(toks):
            t, line = toks[i]
            cur, _, skip = stack[-1]
            if t == "{":
                depth += 1
            elif t == "}":
                depth -= 1
                if stack[-1][1] is not None and depth == stack[-1][1]:
                    stack.pop()
            elif t == "mod" and i + 2 < len(toks) and re.match(r"[A-Za-z_]", toks[i + 1][0]):
                name, nxt = toks[i + 1][0], toks[i + 2][0]
                test = not self.with_tests and cfg_test_before(toks, i)
                if nxt == ";":
                    if test or skip:
                        i += 3
                        continue
                    inline = cur[len(modpath):]
                    f = self.child_file(path, owns_dir, name, inline)
                    if f:
                        children.append((f, cur + (name,)))
                    i += 3
                    continue
                if nxt == "{":
                    stack.append((cur + (name,), depth, skip or test))
                    self.modules.setdefault(cur + (name,), path)
                    depth += 1
                    i += 3
                    continue
            elif t == "use" and (i == 0 or toks[i - 1][0] != "::"):
                j = i + 1
                while j < len(toks) and toks[j][0] != ";":
                    j += 1
                for segs, bound in use_paths([x for x, _ in toks[i + 1:j]]):
                    ab = self.absolute(cur, segs, use=True)
                    if ab is None or skip:
                        continue
                    self.refs.append((cur, ab, path, line))
                    if bound and bound != "_" and ab:
                        self.imports[cur][bound] = ab
                i = j + 1
                continue
            elif t in ("crate", "super", "self") and i + 1 < len(toks) and toks[i + 1][0] == "::" \
                    and (i == 0 or toks[i - 1][0] not in ("$", "::")):
                segs = [t]
                j = i + 1
                while j + 1 < len(toks) and toks[j][0] == "::" and re.match(r"[A-Za-z_]", toks[j + 1][0]):
                    segs.append(toks[j + 1][0])
                    j += 2
                ab = self.absolute(cur, segs, use=False)
                if ab is not None and not skip:
                    self.refs.append((cur, ab, path, line))
                i = j
                continue
            i += 1
        for f, mp in children:
            self.walk(f, mp)

    def absolute(self, cur, segs, use):
        """The path from the crate root, or None for another crate's."""
        if not segs:
            return None
        head, rest = segs[0], segs[1:]
        if head == "crate":
            return tuple(rest)
        if head in ("super", "self"):
            base = list(cur)
            while segs and segs[0] in ("super", "self"):
                if segs[0] == "super":
                    if not base:
                        return None
                    base.pop()
                segs = segs[1:]
            return tuple(base) + tuple(segs)
        if use:
            # 2018 paths: a child module of the current one, else another crate.
            # (Modules are known only once walked: children are walked after
            # their parent, so a `use child::X` is judged at the end.)
            return ("<rel>",) + tuple(cur) + ("<sep>",) + tuple(segs)
        return None

    def resolve(self, path):
        """(module, item) where the path's item is defined, following imports."""
        for _ in range(REEXPORT_HOPS_MAX):
            if path and path[0] == "<rel>":
                k = path.index("<sep>")
                cur, segs = path[1:k], path[k + 1:]
                if cur + segs[:1] in self.modules:
                    path = cur + segs
                elif segs and segs[0] in self.imports.get(cur, {}):
                    path = self.imports[cur][segs[0]] + segs[1:]
                else:
                    return None
                continue
            k = len(path)
            while k > 0 and path[:k] not in self.modules:
                k -= 1
            mod, rest = path[:k], path[k:]
            if rest and rest[0] in self.imports.get(mod, {}):
                nxt = self.imports[mod][rest[0]] + rest[1:]
                if nxt != path:
                    path = nxt
                    continue
            return mod
        return None

    def sibling_edges(self):
        edges = defaultdict(list)  # (parent, a, b) -> [(file, line, path)]
        for frm, to, f, line in self.refs:
            t = self.resolve(to)
            if t is None:
                continue
            k = 0
            while k < len(frm) and k < len(t) and frm[k] == t[k]:
                k += 1
            if k < len(frm) and k < len(t):
                key = (frm[:k], frm[k], t[k])
                shown = "::".join(x for x in to if x not in ("<rel>", "<sep>"))
                edges[key].append((f, line, shown))
        return edges


def sccs(nodes, succ):
    """Tarjan's strongly connected components, deterministic order."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(succ.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def load_allow(repo):
    """(crate, parent) -> list of allowed member sets."""
    allow = defaultdict(list)
    path = os.path.join(repo, ".ci", "import_cycles.allow")
    if not os.path.isfile(path):
        return allow
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            head, members = line.split(":", 1)
            crate, parent = head.split()
            parent = () if parent == "." else tuple(parent.split("::"))
            allow[(crate, parent)].append(set(members.split()))
    return allow


def check_crate(crate_dir, repo, with_tests, allow):
    roots = []
    src = os.path.join(repo, crate_dir, "src")
    for r in ("lib.rs", "main.rs"):
        if os.path.isfile(os.path.join(src, r)):
            roots.append(os.path.join(src, r))
    bindir = os.path.join(src, "bin")
    if os.path.isdir(bindir):
        roots += [os.path.join(bindir, f) for f in sorted(os.listdir(bindir)) if f.endswith(".rs")]
    cycles, allowed = [], []
    n_modules = 0
    for root in roots:
        c = Crate(crate_dir, root, with_tests)
        n_modules += len(c.modules)
        edges = c.sibling_edges()
        by_parent = defaultdict(lambda: defaultdict(set))
        for (parent, a, b) in edges:
            by_parent[parent][a].add(b)
        for parent in sorted(by_parent):
            succ = by_parent[parent]
            nodes = set(succ) | {b for s in succ.values() for b in s}
            for comp in sccs(nodes, succ):
                if len(comp) < 2:
                    continue
                lines = []
                for a in comp:
                    for b in sorted(succ[a]):
                        if b in comp:
                            ev = edges[(parent, a, b)]
                            f, line, shown = ev[0]
                            more = f" (+{len(ev) - 1} more)" if len(ev) > 1 else ""
                            lines.append(f"    {a} -> {b}: {os.path.relpath(f, repo)}:{line} {shown}{more}")
                where = "::".join(parent) or "crate root"
                text = (f"{crate_dir} ({os.path.relpath(root, repo)}), in {where}: "
                        + " <-> ".join(comp) + "\n" + "\n".join(lines))
                if any(set(comp) <= a for a in allow.get((crate_dir, parent), [])):
                    allowed.append(text)
                else:
                    cycles.append(text)
    return cycles, allowed, n_modules


def main():
    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    args = sys.argv[1:]
    with_tests = "--with-tests" in args
    crates = [a for a in args if a != "--with-tests"] or CRATES_DEFAULT
    verbose = "--verbose" in args
    crates = [a for a in crates if a != "--verbose"] or CRATES_DEFAULT
    allow = load_allow(repo)
    all_cycles, all_allowed = [], []
    for c in crates:
        cycles, allowed, n = check_crate(c, repo, with_tests, allow)
        print(f"{c}: {n} modules, {len(cycles)} new cycle(s), {len(allowed)} known (import_cycles.allow)")
        all_cycles += cycles
        all_allowed += allowed
    for c in all_allowed:
        first, _, rest = c.partition("\n")
        print("known cycle (not yet broken): " + first + ("\n" + rest if verbose else ""))
    for c in all_cycles:
        print("cycle: " + c)
    sys.exit(1 if all_cycles else 0)


if __name__ == "__main__":
    main()
