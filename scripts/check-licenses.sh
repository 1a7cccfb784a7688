#!/usr/bin/env bash
# Fails if any dependency's license does not allow use in an Apache-2.0 OR MIT project.
#
# Policy (kept here, next to the code that enforces it):
# - Allowed: permissive licenses — MIT, MIT-0, Apache-2.0 (also WITH LLVM-exception),
#   BSD-2-Clause, BSD-3-Clause, ISC, 0BSD, Zlib, BSL-1.0, CC0-1.0, Unicode-3.0,
#   Unicode-DFS-2016.
# - Allowed with a notice: MPL-2.0. Its copyleft is per file: using an unmodified crate is
#   fine for an Apache/MIT project; changing that crate's files would oblige us to publish
#   those files. The script prints which crates are MPL so a reviewer sees them.
# - Refused: GPL, LGPL, AGPL, SSPL, anything else, and crates with no SPDX `license` field —
#   unless an OR alternative in the same expression is allowed ("MIT OR GPL-2.0" passes).
# Expressions are evaluated properly: OR = any side allowed, AND = both sides allowed,
# "X WITH exception" = X allowed and the exception known; the legacy "/" means OR.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo metadata --format-version 1 --locked 2>/dev/null >/tmp/bw-metadata.json \
  || cargo metadata --format-version 1 >/tmp/bw-metadata.json

python3 - /tmp/bw-metadata.json <<'PY'
import json, re, sys

ALLOWED = {"MIT", "MIT-0", "Apache-2.0", "BSD-2-Clause", "BSD-3-Clause", "ISC", "0BSD",
           "Zlib", "BSL-1.0", "CC0-1.0", "Unicode-3.0", "Unicode-DFS-2016"}
NOTICE = {"MPL-2.0"}
EXCEPTIONS = {"LLVM-exception"}
OWN = "Apache-2.0 OR MIT"

def tokens(expr):
    return re.findall(r"\(|\)|[A-Za-z0-9.+-]+", expr.replace("/", " OR "))

def parse(toks):
    """Returns (allowed, licenses used) for an SPDX expression; precedence WITH > AND > OR."""
    pos = 0
    def peek():
        return toks[pos] if pos < len(toks) else None
    def take():
        nonlocal pos
        pos += 1
        return toks[pos - 1]
    def atom():
        if peek() == "(":
            take(); r = disj()
            if take() != ")": raise ValueError("unbalanced parentheses")
            return r
        lic = take().rstrip("+")
        if peek() == "WITH":
            take(); exc = take()
            ok = (lic in ALLOWED or lic in NOTICE) and exc in EXCEPTIONS
            return (ok, {lic} if ok else set())
        ok = lic in ALLOWED or lic in NOTICE
        return (ok, {lic} if ok else set())
    def conj():
        ok, used = atom()
        while peek() == "AND":
            take(); ok2, used2 = atom(); ok, used = ok and ok2, used | used2
        return (ok, used if ok else set())
    def disj():
        ok, used = conj()
        while peek() == "OR":
            take(); ok2, used2 = conj()
            # Prefer an alternative without a notice licence.
            if not ok or (ok2 and not (used2 & NOTICE) and (used & NOTICE)):
                ok, used = ok2, used2
        return (ok, used)
    r = disj()
    if pos != len(toks): raise ValueError("trailing tokens")
    return r

meta = json.load(open(sys.argv[1]))
members = set(meta["workspace_members"])
bad, notices, checked = [], [], 0
for p in meta["packages"]:
    name = f'{p["name"]} {p["version"]}'
    lic = p.get("license")
    if p["id"] in members:
        if lic != OWN:
            bad.append(f"{name}: workspace crate must be licensed {OWN!r}, is {lic!r}")
        continue
    checked += 1
    if not lic:
        bad.append(f"{name}: no SPDX license field (license-file: {p.get('license_file')})")
        continue
    try:
        ok, used = parse(tokens(lic))
    except (ValueError, IndexError) as e:
        bad.append(f"{name}: unparsable license {lic!r} ({e})"); continue
    if not ok:
        bad.append(f"{name}: license {lic!r} is not allowed")
    elif used & NOTICE:
        notices.append(f"{name}: {lic} (file-level copyleft; do not modify its files)")

for n in notices:
    print(f"license notice: {n}")
if bad:
    for b in bad:
        print(f"license error: {b}", file=sys.stderr)
    print(f"licenses: FAILED ({len(bad)} problems in {checked} dependencies)", file=sys.stderr)
    sys.exit(1)
print(f"licenses: OK ({checked} dependencies, {len(members)} workspace crates)")
PY
